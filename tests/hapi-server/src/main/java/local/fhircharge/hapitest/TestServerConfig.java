package local.fhircharge.hapitest;

import ca.uhn.fhir.batch2.jobs.config.Batch2JobsConfig;
import ca.uhn.fhir.batch2.maintenance.JobMaintenanceServiceImpl;
import ca.uhn.fhir.context.FhirContext;
import ca.uhn.fhir.jpa.api.config.JpaStorageSettings;
import ca.uhn.fhir.jpa.api.config.ThreadPoolFactoryConfig;
import ca.uhn.fhir.jpa.batch2.JpaBatch2Config;
import ca.uhn.fhir.jpa.binary.api.IBinaryStorageSvc;
import ca.uhn.fhir.jpa.binstore.MemoryBinaryStorageSvcImpl;
import ca.uhn.fhir.jpa.config.HapiJpaConfig;
import ca.uhn.fhir.jpa.config.r4.JpaR4Config;
import ca.uhn.fhir.jpa.config.util.HapiEntityManagerFactoryUtil;
import ca.uhn.fhir.jpa.model.config.PartitionSettings;
import ca.uhn.fhir.jpa.model.config.SubscriptionSettings;
import ca.uhn.fhir.jpa.model.dialect.HapiFhirH2Dialect;
import ca.uhn.fhir.jpa.searchparam.config.NicknameServiceConfig;
import ca.uhn.fhir.jpa.searchparam.submit.config.SearchParamSubmitterConfig;
import ca.uhn.fhir.jpa.subscription.channel.config.SubscriptionChannelConfig;
import ca.uhn.fhir.jpa.subscription.match.config.SubscriptionProcessorConfig;
import ca.uhn.fhir.jpa.subscription.match.deliver.email.IEmailSender;
import ca.uhn.fhir.jpa.subscription.submit.config.SubscriptionSubmitterConfig;
import ca.uhn.fhir.rest.api.SearchTotalModeEnum;
import jakarta.persistence.EntityManagerFactory;
import org.apache.commons.dbcp2.BasicDataSource;
import org.slf4j.Logger;
import org.slf4j.LoggerFactory;
import org.springframework.beans.factory.config.BeanPostProcessor;
import org.springframework.beans.factory.config.ConfigurableListableBeanFactory;
import org.springframework.context.annotation.Bean;
import org.springframework.context.annotation.Configuration;
import org.springframework.context.annotation.Import;
import org.springframework.context.annotation.Primary;
import org.springframework.orm.jpa.JpaTransactionManager;
import org.springframework.orm.jpa.LocalContainerEntityManagerFactoryBean;
import org.springframework.transaction.annotation.EnableTransactionManagement;

import javax.sql.DataSource;
import java.time.Duration;
import java.util.Properties;

/**
 * Spring wiring for the project's HAPI FHIR JPA test server: R4, in-memory H2,
 * rest-hook subscriptions, settings tuned for integration tests (see docs/hapi-test-server.md).
 */
@Configuration
@EnableTransactionManagement
@Import({
	JpaR4Config.class,
	HapiJpaConfig.class,
	JpaBatch2Config.class,
	Batch2JobsConfig.class,
	ThreadPoolFactoryConfig.class,
	NicknameServiceConfig.class,
	SearchParamSubmitterConfig.class,
	SubscriptionSubmitterConfig.class,
	SubscriptionProcessorConfig.class,
	SubscriptionChannelConfig.class
})
public class TestServerConfig {

	private static final Logger LOG = LoggerFactory.getLogger(TestServerConfig.class);

	/** In-memory database; survives connection churn thanks to DB_CLOSE_DELAY=-1. */
	static final String JDBC_URL = "jdbc:h2:mem:hapi_test;DB_CLOSE_DELAY=-1";

	@Bean
	public JpaStorageSettings storageSettings() {
		JpaStorageSettings settings = new JpaStorageSettings();
		// Client-assigned ids such as "s01-pat" via PUT; purely numeric ids are rejected by HAPI.
		settings.setResourceClientIdStrategy(JpaStorageSettings.ClientIdStrategyEnum.ALPHANUMERIC);
		settings.setEnforceReferentialIntegrityOnWrite(true);
		settings.setEnforceReferentialIntegrityOnDelete(true);
		settings.setAllowMultipleDelete(true);
		settings.setExpungeEnabled(true);
		settings.setDeleteExpungeEnabled(true);
		// Every search hits the database: no stale results between test steps.
		settings.setReuseCachedSearchResultsForMillis(null);
		settings.setAutoCreatePlaceholderReferenceTargets(false);
		settings.setAllowExternalReferences(false);
		// Bulk Data $export (registered in TestServerMain): every kick-off runs a new job (no reuse of an
		// earlier identical export's files), and batch2 steps advance as soon as their chunks are done.
		settings.setEnableBulkExportJobReuse(false);
		settings.setJobFastTrackingEnabled(true);
		return settings;
	}

	@Bean
	public PartitionSettings partitionSettings() {
		return new PartitionSettings();
	}

	@Bean
	public SubscriptionSettings subscriptionSettings() {
		SubscriptionSettings settings = new SubscriptionSettings();
		settings.addSupportedSubscriptionType(
				org.hl7.fhir.dstu2.model.Subscription.SubscriptionChannelType.RESTHOOK);
		settings.setSubscriptionChangeQueuedImmediately(true);
		settings.setEnableInMemorySubscriptionMatching(true);
		return settings;
	}

	@Bean(destroyMethod = "close")
	public BasicDataSource dataSource() {
		BasicDataSource ds = new BasicDataSource();
		ds.setDriver(new org.h2.Driver());
		ds.setUrl(JDBC_URL);
		ds.setUsername("sa");
		ds.setPassword("");
		ds.setMaxTotal(20);
		ds.setMaxWait(Duration.ofSeconds(30));
		return ds;
	}

	@Bean
	public LocalContainerEntityManagerFactoryBean entityManagerFactory(
			ConfigurableListableBeanFactory beanFactory,
			FhirContext fhirContext,
			JpaStorageSettings storageSettings,
			DataSource dataSource) {
		LocalContainerEntityManagerFactoryBean emf =
				HapiEntityManagerFactoryUtil.newEntityManagerFactory(beanFactory, fhirContext, storageSettings);
		emf.setPersistenceUnitName("HAPI_TEST_PU");
		emf.setDataSource(dataSource);
		emf.setJpaProperties(jpaProperties());
		return emf;
	}

	private static Properties jpaProperties() {
		Properties p = new Properties();
		p.put("hibernate.dialect", HapiFhirH2Dialect.class.getName());
		p.put("hibernate.hbm2ddl.auto", "update");
		p.put("hibernate.search.enabled", "false");
		p.put("hibernate.format_sql", "false");
		p.put("hibernate.show_sql", "false");
		p.put("hibernate.jdbc.batch_size", "20");
		p.put("hibernate.cache.use_query_cache", "false");
		p.put("hibernate.cache.use_second_level_cache", "false");
		p.put("hibernate.cache.use_structured_entries", "false");
		p.put("hibernate.cache.use_minimal_puts", "false");
		return p;
	}

	@Bean
	@Primary
	public JpaTransactionManager transactionManager(EntityManagerFactory entityManagerFactory) {
		JpaTransactionManager tm = new JpaTransactionManager();
		tm.setEntityManagerFactory(entityManagerFactory);
		return tm;
	}

	/** The e-mail channel is unused; the subscription machinery still needs a sender bean. */
	@Bean
	public IEmailSender emailSender() {
		return details -> LOG.warn("E-mail subscription channel is not supported by the test server; dropped {}", details);
	}

	/**
	 * Batch2 jobs (Bulk Data $export) move on in HAPI's maintenance pass, scheduled once a minute by default:
	 * a test export would wait a minute or two. Every 2 s here, set before HAPI schedules it.
	 */
	@Bean
	public static BeanPostProcessor fasterJobMaintenance() {
		return new BeanPostProcessor() {
			@Override
			public Object postProcessBeforeInitialization(Object bean, String beanName) {
				if (bean instanceof JobMaintenanceServiceImpl maintenance) {
					maintenance.setScheduledJobFrequencyMillis(JOB_MAINTENANCE_MILLIS);
				}
				return bean;
			}
		};
	}

	static final long JOB_MAINTENANCE_MILLIS = 2_000;

	@Bean
	public IBinaryStorageSvc binaryStorageSvc() {
		return new MemoryBinaryStorageSvcImpl();
	}
}
