package local.fhircharge.hapitest;

import ca.uhn.fhir.batch2.jobs.export.BulkDataExportProvider;
import ca.uhn.fhir.context.FhirContext;
import ca.uhn.fhir.context.support.IValidationSupport;
import ca.uhn.fhir.jpa.api.config.JpaStorageSettings;
import ca.uhn.fhir.jpa.api.dao.IFhirSystemDao;
import ca.uhn.fhir.jpa.provider.JpaCapabilityStatementProvider;
import ca.uhn.fhir.jpa.provider.JpaSystemProvider;
import ca.uhn.fhir.jpa.search.DatabaseBackedPagingProvider;
import ca.uhn.fhir.jpa.searchparam.registry.SearchParamRegistryImpl;
import ca.uhn.fhir.jpa.subscription.match.registry.SubscriptionLoader;
import ca.uhn.fhir.jpa.subscription.match.registry.SubscriptionRegistry;
import ca.uhn.fhir.rest.api.EncodingEnum;
import ca.uhn.fhir.rest.server.RestfulServer;
import ca.uhn.fhir.rest.server.provider.ResourceProviderFactory;
import ca.uhn.fhir.rest.server.util.ISearchParamRegistry;
import org.eclipse.jetty.ee10.servlet.ServletContextHandler;
import org.eclipse.jetty.ee10.servlet.ServletHolder;
import org.eclipse.jetty.server.Server;
import org.eclipse.jetty.server.ServerConnector;
import org.slf4j.Logger;
import org.slf4j.LoggerFactory;
import org.springframework.context.annotation.AnnotationConfigApplicationContext;

/**
 * Starts the HAPI FHIR JPA test server on http://127.0.0.1:PORT/fhir.
 * PORT comes from -Dhapi.port, else env HAPI_PORT, else 8089.
 */
public final class TestServerMain {

	private static final Logger LOG = LoggerFactory.getLogger(TestServerMain.class);
	static final int DEFAULT_PAGE_SIZE = 50;
	static final int MAX_PAGE_SIZE = 1000;

	private TestServerMain() {}

	public static void main(String[] args) throws Exception {
		long t0 = System.nanoTime();
		int port = resolvePort();
		String host = System.getProperty("hapi.host", "127.0.0.1");

		AnnotationConfigApplicationContext ctx = new AnnotationConfigApplicationContext(TestServerConfig.class);
		ctx.registerShutdownHook();
		RestfulServer fhirServlet = buildRestfulServer(ctx);

		Server jetty = new Server();
		ServerConnector connector = new ServerConnector(jetty);
		connector.setHost(host);
		connector.setPort(port);
		jetty.addConnector(connector);

		ServletContextHandler handler = new ServletContextHandler();
		handler.setContextPath("/");
		ServletHolder holder = new ServletHolder("fhir", fhirServlet);
		holder.setInitOrder(1);
		handler.addServlet(holder, "/fhir/*");
		jetty.setHandler(handler);
		jetty.setStopAtShutdown(true);
		try {
			jetty.start();
		} catch (Exception e) {
			LOG.error("Jetty failed to start on {}:{}", host, port, e);
			ctx.close();
			System.exit(2);
		}

		long ms = (System.nanoTime() - t0) / 1_000_000;
		LOG.info("HAPI FHIR test server ready at http://{}:{}/fhir after {} ms", host, port, ms);
		jetty.join();
	}

	private static int resolvePort() {
		String p = System.getProperty("hapi.port");
		if (p == null || p.isBlank()) {
			p = System.getenv("HAPI_PORT");
		}
		return (p == null || p.isBlank()) ? 8089 : Integer.parseInt(p.trim());
	}

	@SuppressWarnings({"rawtypes", "unchecked"})
	private static RestfulServer buildRestfulServer(AnnotationConfigApplicationContext ctx) {
		FhirContext fhirContext = ctx.getBean(FhirContext.class);
		RestfulServer server = new RestfulServer(fhirContext);
		server.setServerName("fhir-charge-adapter HAPI test server");
		server.setImplementationDescription("HAPI FHIR JPA (R4, H2 in-memory) for tests and demos");
		server.setDefaultResponseEncoding(EncodingEnum.JSON);

		server.registerProviders(ctx.getBean(ResourceProviderFactory.class).createProviders());
		server.registerProvider(ctx.getBean(JpaSystemProvider.class));
		// FHIR Bulk Data $export (system, Patient, Group level): kick-off, status polling, NDJSON Binary outputs.
		// The batch2 job definitions come from Batch2JobsConfig, the provider bean from HAPI's JpaConfig.
		server.registerProvider(ctx.getBean(BulkDataExportProvider.class));
		server.registerProvider(new TestResetProvider(
				ctx.getBean(IFhirSystemDao.class),
				ctx.getBean(SubscriptionRegistry.class),
				ctx.getBean(SubscriptionLoader.class),
				ctx.getBean(SearchParamRegistryImpl.class)));

		DatabaseBackedPagingProvider paging = ctx.getBean(DatabaseBackedPagingProvider.class);
		paging.setDefaultPageSize(DEFAULT_PAGE_SIZE);
		paging.setMaximumPageSize(MAX_PAGE_SIZE);
		server.setPagingProvider(paging);

		IFhirSystemDao systemDao = ctx.getBean(IFhirSystemDao.class);
		JpaStorageSettings storageSettings = ctx.getBean(JpaStorageSettings.class);
		ISearchParamRegistry searchParamRegistry = ctx.getBean(ISearchParamRegistry.class);
		IValidationSupport validationSupport = ctx.getBean(IValidationSupport.class);
		server.setServerConformanceProvider(new JpaCapabilityStatementProvider(
				server, systemDao, storageSettings, searchParamRegistry, validationSupport));
		return server;
	}
}
